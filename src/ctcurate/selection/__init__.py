"""Pneumonia CT selection: body region from headers, image features, the scorer."""
