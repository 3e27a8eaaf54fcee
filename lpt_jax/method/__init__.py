"""The method: the model around the frozen backbone (LPT's prompts, pool, keys and cosine
head), its phases, losses, optimiser and the train step every phase runs."""
