"""The discrete-event model: a GPU compute stream (a SimPy process) and the data paths it feeds (links, NVMe
SSDs, DRAM staging buffers), whose events run on a calendar the stream catches up with; wired by
:mod:`tierflow.sim.engine`."""
