"""The tiny family builders, one module per model family (registered in cwdpo.model.families)."""
