"""`make bench`: measure gptlab's speed on this machine and print the figures.

Timings are printed, never asserted: they belong in the README's performance section with the
machine they were taken on, not in tests that would turn flaky on a busy machine. Run it as
`python -m gptlab.bench`; no other part of gptlab imports it.
"""
