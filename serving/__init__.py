"""Serving the adaptive classifier over HTTP with Ray Serve: operating points per request, a latency controller,
an online audit, request parsing (pure, no Ray), and the Ray Serve application (``serving.app``, needs
``pip install -e ".[serve]"``)."""
