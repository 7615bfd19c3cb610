"""Benchmarks (run as scripts; see each module). A regular package, so that another
distribution's top-level ``benchmarks`` package (Opacus ships one) cannot shadow it."""
