"""Growing canvases: a canvas extended step by step in one of four directions."""
