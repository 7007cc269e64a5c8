"""Mutual recognition (检查检验结果互认): the catalogue of recognised items, institutions'
QC accreditations, the evaluation at signing, the lookup of still-valid results, declines."""
