"""The web page (``lgseg serve``): the report loop in a browser, on trame-slicer. Needs the ``[web]`` extra."""
