"""Glue to MONAI engines: generic train step, method handlers, trainer builders."""
