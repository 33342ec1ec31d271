"""Relative flatness: Hessian-trace maths, fast estimators, the FAM regulariser, measurement."""
