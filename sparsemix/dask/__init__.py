"""dask"""
