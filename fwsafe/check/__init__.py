"""Prediction before anything changes: the lockout check with the real kernel in a scratch
namespace, and trying a change on a copy (diff).
"""
