package integration
import ("context";"testing";"time";"github.com/coder/websocket")
func TestSmoke(t *testing.T){
	ctx,cancel:=context.WithTimeout(context.Background(),5*time.Second);defer cancel()
	c,resp,err:=websocket.Dial(ctx,"ws://127.0.0.1:8080/ws",&websocket.DialOptions{HTTPHeader: map[string][]string{"Origin":{"http://127.0.0.1:8080"}}})
	if err!=nil{t.Fatal(err,resp)}; c.SetReadLimit(-1)
	for _,n:=range []int{0,5,125,126,70000,1<<20-1}{
		msg:=make([]byte,n); for i:=range msg{msg[i]=byte('a'+i%26)}
		if err:=c.Write(ctx,websocket.MessageText,msg);err!=nil{t.Fatal(err)}
		typ,got,err:=c.Read(ctx); if err!=nil{t.Fatal(n,err)}
		if typ!=websocket.MessageText||string(got)!=string(msg){t.Fatal("mismatch",n)}
	}
	c.Close(4001,"bye")
}
