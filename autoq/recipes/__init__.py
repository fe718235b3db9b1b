"""Recipes turn (FP32 model, plan) into an int8 model."""
