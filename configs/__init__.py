"""Serve configs and engine presets, shipped as package data so a wheel install finds them."""
