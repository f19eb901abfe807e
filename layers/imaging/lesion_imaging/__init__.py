"""The image side of an upload (deployed as the imaging layer, with Pillow and NumPy).

``validation`` (is it a usable image; its clean copy and pHash), ``jpeg_strip`` (metadata removed without a
re-encode), ``pixels`` (decoding shared with the serving image), ``hash_index`` (exact and near-duplicate search)
and ``intake`` (the image flow of validate_image).
"""
