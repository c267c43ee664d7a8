"""Workstation side: base and adapter exporters. Needs `pip install 'edgepeft[export]'`."""

from .bundle_export import add_adapter, export_bundle

__all__ = ["add_adapter", "export_bundle"]
