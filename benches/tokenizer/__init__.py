"""The tokenizer benchmark (``benches/bench_tokenizer.py``), one module per comparison.

* :mod:`.common` -- the shared files, the libraries and their labels, text helpers;
* :mod:`.inputs` -- the samples every section reads (cut from the corpus once per run);
* :mod:`.libs` -- one adapter per library: its trainer and its encoder, each through the
  library's fastest natural API;
* :mod:`.worker` -- the worker protocol: every measurement runs in a fresh process whose peak
  RSS is its own (:func:`harness.run_measured`);
* :mod:`.train`, :mod:`.encode`, :mod:`.patho` -- the three comparisons, each returning the run
  blocks it appends to ``benches/RESULTS.md``.

Nothing here imports a tokenizer library at module level: a worker imports only the one it
measures, so its idle RSS is that library's.
"""
