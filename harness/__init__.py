"""Everything that exercises driver_plugin.py and is not the product: the mock driver server, the
demo, bench, conformance, loop and e2e, with their shared support module and their own tests.

Run from the repository's root, as ``make`` does: ``python3 -m harness.demo``, ``python3 -m
harness.conformance.suite ...``; nothing here edits ``sys.path``.
"""
