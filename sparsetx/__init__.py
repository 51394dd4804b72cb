"""sparsetx"""
