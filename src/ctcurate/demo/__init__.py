"""The built-in synthetic hospital archive (``ctcurate synth``) and its truth audit: demo only."""
