"""Infinite Talk: lip-synced talking video of any length (InfiniteTalk on Wan2.1-I2V-14B)."""

__version__ = "0.1.0"
