"""SPAN / DSCLoRA super-resolution example: models, data, metrics, tools."""
