"""The evaluation harness: the plan (`plan`), the grid runner (`runner`), result files (`results`) and the one
budget parser (`budgets`)."""
