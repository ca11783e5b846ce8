"""Jinja2 templates of the web interface (a package so that they ship as package data)."""
