"""The HTML report: one self-contained page of suspicious examples, explanations and charts."""

from vestigia.report.data import Explanation, ReportData, load_noise_mask
from vestigia.report.page import render_report, write_report

__all__ = ["Explanation", "ReportData", "load_noise_mask", "render_report", "write_report"]
