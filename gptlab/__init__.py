"""The library the command-line scripts share: errors and flags, devices, token data, the training step,
checkpoints, Hugging Face conversion, metrics and statistics. The model itself lives in gpt.py and attention.py."""
