"""Restoration example: one small residual CNN, per-task ConvLoRA adapters for denoising and deblurring."""
