"""Scoring a reconstruction against its target: PSNR, SSIM, LPIPS, leak indicators, BRR/WSRR.

Imports: shared modules (suite.results, suite.errors) only."""
