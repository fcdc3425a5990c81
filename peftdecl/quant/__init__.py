"""Reference codecs of quantised base weights, in NumPy, bit-identical to the libraries that store them:
bitsandbytes' NF4/FP4 (blockwise absmax, optional double quantisation) and int8 row-wise, and MLX's affine
groups. Backends describe a quantised layer with :class:`peftdecl.quant.scheme.QuantScheme`."""
