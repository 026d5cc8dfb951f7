"""An email campaign send through tiercache, measured against the origin alone.

Run it with ``python -m tiercache.demo`` (``--help`` lists the options).
"""
