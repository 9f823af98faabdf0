"""Data-driven request corpora for the img2img service (bad input and valid-after-all input)."""
