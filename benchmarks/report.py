"""Shared by the benchmark scripts: the markdown report writer of ``fusionkit bench`` (one implementation)."""

from fusionkit.engine.bench import device_label, markdown_table, write_section

__all__ = ["device_label", "markdown_table", "write_section"]
