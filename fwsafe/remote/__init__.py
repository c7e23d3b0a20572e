"""Driving a host over SSH from a workstation: host keys, the remote apply flow.
"""
