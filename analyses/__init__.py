"""Scripts that regenerate every figure, table and number of the paper from runs.

``python -m analyses`` (or ``make paper``) runs the paper's conditions through
:func:`reduce.pipeline.run` where they are missing, the zoo through
:func:`reduce.universality.universality`, and writes ``paper/figures/``, ``paper/tables/``,
``paper/numbers.json``, ``paper/paper.md`` (from ``paper/paper.template.md``) and ``paper/paper.html``.
``python -m analyses.screenshot PAGE.html OUT.png`` checks a page's layout in headless Chromium.
"""
