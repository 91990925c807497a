"""The names of the evaluated methods, importable without torch (for command-line help); the registry builds them."""

METHOD_NAMES = ("dense", "double_sparsity", "oracle_topk", "random_channels", "streaming_llm", "h2o", "quest", "sparq")
