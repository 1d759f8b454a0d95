from piopiy_voice.blas import single_threaded

single_threaded()  # before numpy loads: see piopiy_voice.blas
