"""All-combination evaluation: metrics, tables and figures."""
