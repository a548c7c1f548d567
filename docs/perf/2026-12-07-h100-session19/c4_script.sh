# session 19, call 4: NOT RUN (refused twice, then too little device time left to start a machine).
# Its A/B is the first part of next_c1_script.sh.
