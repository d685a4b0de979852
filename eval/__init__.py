"""Evaluation of what reduction costs and saves: analytic FLOPs and the prefill benchmark (``vtr bench``)."""
