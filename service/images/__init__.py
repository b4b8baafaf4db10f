"""Images: size normalization, reference and output validation (Pillow), and blob storage."""
