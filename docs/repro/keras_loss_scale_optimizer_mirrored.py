"""Keras 3 LossScaleOptimizer under MirroredStrategy: does a step whose gradient overflows on
replica 1 only get skipped?"""
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import numpy as np
import tensorflow as tf
cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
import keras

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
keras.mixed_precision.set_global_policy("mixed_float16")
with strategy.scope():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.01), initial_scale=2.0**15)
    model.compile(optimizer, loss="mse")
x = np.array([[1.0], [1.0]], np.float32)
y = np.array([[0.0], [3.0e4]], np.float32)  # replica 0: gradient 0; replica 1: 2 * 3e4 * 2^15 / 2 overflows float16
model.fit(x, y, batch_size=2, epochs=1, verbose=0, shuffle=False)
print("keras", keras.__version__, "tf", tf.__version__)
print("weights after one step:", [w.tolist() for w in model.get_weights()])
print("loss scale after:", float(optimizer.dynamic_scale.numpy()), "(a skipped step halves it to 16384)")
print("strategy_supports_no_merge_call:", tf.__internal__.distribute.strategy_supports_no_merge_call())
