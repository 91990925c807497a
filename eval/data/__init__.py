"""Data the evaluation and the bundled model's training share: synthetic retrieval documents, the BPE recipe."""
