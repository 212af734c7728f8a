"""fastlivt: high-throughput LiVT (MGP + Balanced Fine-Tuning) for Vision Transformers on long-tailed data."""
__version__ = "0.1.0"
