"""The tutorial's library: lend books, take them back, notice overdue loans.

The code the tutorial (docs/tutorial/index.md) shows, and runkit-core's
tests/test_tutorial.py runs end to end.
"""
