"""The SigLIP text tower (`tower`) and the cosine head it initialises from class names
(`head`)."""
