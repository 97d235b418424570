"""Human table, JSON and self-contained HTML renderings of a parity report."""
from sn_deploy.report.render import render_html, render_table, write_reports

__all__ = ["render_html", "render_table", "write_reports"]
