"""I/O towards hosts lives here, behind the small interfaces of ``base``."""
