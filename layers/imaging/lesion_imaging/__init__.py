"""Image checks for uploaded dermoscopy images (deployed as the imaging layer, with Pillow and NumPy)."""
