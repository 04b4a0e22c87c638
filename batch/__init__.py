"""batch: the Ray Data batch upscaling pipeline."""
