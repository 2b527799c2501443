"""The CLI's non-training commands: generate, score, sample-for-ranking, data-stats, report, plan-memory, train-tokenizer."""
