"""The ``compress`` command line: a thin layer over the library (see ``compress --help``)."""
