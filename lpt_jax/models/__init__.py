"""Models: the frozen ViT backbone and the LPT prompts around it."""
