"""The web page: server-rendered HTML and SVG, no scripts and no third-party assets."""
